# The image every dtf service in compose.yaml runs: dtf installed from this checkout.
# Workers run tests inside it, so a project's test dependencies go into an image built FROM this one.
FROM python:3.11-slim
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
 && useradd --create-home dtf \
 && mkdir -p /data \
 && chown dtf /data
USER dtf
WORKDIR /home/dtf
CMD ["dtf", "--help"]
