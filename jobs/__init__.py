"""Entry points that a user, ``make demo`` or ``ray job submit`` runs (``python -m jobs.<name>``)."""
