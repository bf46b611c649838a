"""The bot: knowledge base, LLM client, context, cache, policy."""
