"""Configuration: where things live (`paths`); the recipe schema moves here next (issue 32)."""
