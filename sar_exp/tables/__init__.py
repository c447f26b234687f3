"""Paper tables: run a method/backbone grid over seeds and print it in the paper's layout."""
