"""Collection classifier training: labelled embeddings in, versioned models, a bake-off, best_models.json out."""
