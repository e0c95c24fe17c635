"""Streaming server of flashdreams: `flashdreams-serve`, its protocol and its web page."""
