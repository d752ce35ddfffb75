"""FX passes that find attention in graphs and rewrite it into SFA; one pass per file."""
