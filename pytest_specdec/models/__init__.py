"""Model-based drafting parts (EAGLE-3 heads, draft language models, their training):
importable by third-party drafters too."""
