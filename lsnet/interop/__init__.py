"""Interoperability with other LSNet implementations (the authors' reference code)."""
