"""Lab tools for tests, benchmarks and demos; nothing in the serving node imports them (an import contract holds it)."""
