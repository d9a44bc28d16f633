"""Tests of ft_assets/methods/."""
