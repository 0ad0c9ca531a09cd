"""Write-back: findings as DICOM SEG and TID 1500 SR into the PACS (issue #7)."""
