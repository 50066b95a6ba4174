"""Restoration metrics as the published evaluation protocols define them (pyiqa, clean-fid, ReF-LDM)."""
