"""Stage 0: sources and formats, chat templating + loss masks, token counting, the built-in task mixture."""
