"""Hooks own connections and clients; operators and jobs get plain values from them."""
