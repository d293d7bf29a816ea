"""Ray jobs of Factorized-Dreamer (only this package imports Ray)."""
