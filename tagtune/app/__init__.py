"""The app layer: the `tagtune` command, chat, the web page. Nothing in tagtune/, stages/ or flows/ imports it."""
