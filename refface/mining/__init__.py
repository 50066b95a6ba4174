"""Identity mining: faces, embeddings, neighbour graphs, clustering, references, splits, audit."""
