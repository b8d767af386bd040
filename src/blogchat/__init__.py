"""blogchat: a blog with a Claude assistant readers can chat with."""
