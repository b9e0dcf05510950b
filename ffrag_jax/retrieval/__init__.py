"""Retrieval: the Flax sentence encoder, indexes and knowledge bases."""
