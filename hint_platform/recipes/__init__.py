"""Recipes: whole chains of the platform's stages (the offline demo)."""
