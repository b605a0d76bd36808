# LesionStudio web app: docker build -t lesionstudio . && docker run -p 7860:7860 lesionstudio
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    LESIONSTUDIO_IN_CONTAINER=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY lesionstudio ./lesionstudio
COPY checkpoints ./checkpoints
COPY examples ./examples
COPY app.py README.md ./

# Run as an unprivileged user; uploads are only held in Gradio's temporary folder.
RUN useradd --create-home studio && chown -R studio /app
USER studio

EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
