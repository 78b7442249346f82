"""The web dashboard (`portfolio ui`): server-rendered pages and a JSON API over the registry."""
