"""Tests of ft_assets/evaluation/."""
