"""Tests of ft_assets/data/."""
