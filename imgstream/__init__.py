"""imgstream: streaming image analysis on Kafka.

The distribution installs this one top-level name. Its rooms live in the repository's top-level
folders (`schemas/`, `analysis/`, `consumer/`, ...) and are imported as `imgstream.<room>`; in a
checkout, `imgstream/<room>` links to them, and an installed wheel holds them here.
"""

__version__ = "0.1.0"
