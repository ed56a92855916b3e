"""The live web dashboard on the admin listener (`/`): static page, per-second traffic series,
release history and the switch/rollback buttons (routes.py wires them into an admin API)."""
