"""The command-line room: the only part of runtime that imports click."""
