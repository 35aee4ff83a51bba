"""Platform adapters: turn platform events into ``bot.events.ChatEvent`` and send replies.

Platform libraries are imported only here, and only by the adapter that needs them.
"""
