"""fedfstq package."""
