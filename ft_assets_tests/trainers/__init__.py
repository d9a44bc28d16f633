"""Tests of ft_assets/trainers/."""
