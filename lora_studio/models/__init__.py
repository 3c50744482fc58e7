"""Finding, recognising and loading base models (and building tiny offline ones for tests and --demo)."""
