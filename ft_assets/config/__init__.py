"""The recipe: schema, loading and validation (recipe.py), and where things live (paths.py).
Knows no torch and no Dagster; every other room may import it."""
