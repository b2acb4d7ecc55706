"""The directory ``loadertune run`` puts on ``PYTHONPATH``: only ``sitecustomize`` lives here."""
