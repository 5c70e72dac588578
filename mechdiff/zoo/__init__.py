"""The embedded default: a synthetic world and a tiny base / post-trained model pair."""
