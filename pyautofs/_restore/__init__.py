"""Private implementation layer; see docs/design."""
