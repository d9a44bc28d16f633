"""The command line: `python -m ft_assets <command>` (main.py), `init` (a recipe for a data file),
`chat`, and the generated recipe reference. May import anything below it; nothing imports it."""
