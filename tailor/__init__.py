"""tailor: personalize a language model for each of its users, cheaply enough for millions of them."""

__version__ = "0.1.0"
