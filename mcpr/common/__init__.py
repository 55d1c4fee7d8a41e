"""What both daemons share, and nothing else: it imports nothing from the rest of mcpr."""
