"""Contacts and notifications arrive with their own issue."""
