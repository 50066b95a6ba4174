"""Identity review page and hand corrections of clusters."""
