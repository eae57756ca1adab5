"""Model implementations (our own; transformers is only a test oracle here)."""
