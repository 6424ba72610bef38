"""Project tooling that stays in the checkout (not installed with camserve); run from the
repository root, e.g. ``python -m tools.shapes evaluate --model models/shapes --seed 1234``."""
