"""Tables of the seed documents from run folders (scripts/seed*.py are their command lines)."""
