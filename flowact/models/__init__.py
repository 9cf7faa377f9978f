"""flowact/models"""
