"""User encoders and scorers that methods wrap (ClardRec Appendix B.3; DIN)."""
