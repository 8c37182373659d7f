"""The seed's own example code, exactly as the product page gives it
(../shared/seed/code-interpreter-seed.md), shared by the kernel-level and the
REST-level tests."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SEED_BAR_CHART = """
import matplotlib.pyplot as plt
import numpy as np

# Generate sample data
categories = ['Critical', 'High', 'Medium', 'Low']
counts = [5, 12, 28, 45]

# Create bar chart
plt.figure(figsize=(10, 6))
plt.bar(categories, counts, color=['red', 'orange', 'yellow', 'green'])
plt.title('Incidents by Severity')
plt.xlabel('Severity Level')
plt.ylabel('Count')
plt.savefig('/mnt/data/incidents_by_severity.png', dpi=150)
"""

SEED_PANDAS_SUMMARY = """
import pandas as pd

# Load incident data
df = pd.read_csv('/mnt/data/incidents.csv')

# Calculate summary statistics
summary = df.groupby('category').agg({
    'id': 'count',
    'resolution_time': 'mean'
}).rename(columns={'id': 'count', 'resolution_time': 'avg_resolution_hours'})

# Export results
summary.to_csv('/mnt/data/incident_summary.csv')
print(summary)
"""

SEED_SEABORN_CHART = """
import matplotlib.pyplot as plt
import seaborn as sns

# Load data
df = pd.read_csv('/mnt/data/incidents.csv')

# Create visualization
plt.figure(figsize=(12, 6))
sns.barplot(data=df, x='category', y='count', palette='viridis')
plt.title('Incidents by Category')
plt.xticks(rotation=45)
plt.tight_layout()
plt.savefig('/mnt/data/category_chart.png', dpi=150)
"""

SEED_PDF_REPORT = """
from reportlab.pdfgen import canvas
from reportlab.lib.pagesizes import letter

# Create PDF
c = canvas.Canvas('/mnt/data/weekly_report.pdf', pagesize=letter)

# Add content
c.setFont('Helvetica-Bold', 18)
c.drawString(72, 750, 'Weekly Incident Report')

c.setFont('Helvetica', 12)
c.drawString(72, 720, 'Period: January 10-17, 2026')
c.drawString(72, 700, 'Total incidents: 90')
c.drawString(72, 680, 'Critical incidents: 5')
c.drawString(72, 660, 'Average resolution time: 4.2 hours')

c.save()
"""
