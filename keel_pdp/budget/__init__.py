"""Budget store: atomic holds and settlements in Redis through Lua scripts."""
