"""kn: a reproducible Knowledge Neurons pipeline (Dai et al., ACL 2022)."""

__version__ = "0.1.0"
