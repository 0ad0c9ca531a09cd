"""De-identification: PS3.15 Annex E profile, keyed pseudonyms and date shifts (issue #4)."""
