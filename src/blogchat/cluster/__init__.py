"""Several instances of one blog: what they share in Redis, and how chats move between them."""
