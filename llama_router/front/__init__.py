"""What faces the client before the relay: keys, browser guard, CORS, client limits, the access log."""
