"""Graph passes. One pass per file, named `verb_noun.py`; matching annotates, rewriting reads."""
