"""Forward-model implementations (installed as ``enkal.models``)."""
