# The image every dtf service in compose.yaml runs: dtf installed from this checkout, at the versions
# .ci/constraints.txt pins. pytest comes with dtf (submit collects with it, workers run it); a task
# whose project declares its dependencies gets an environment uv builds on the worker (--env auto),
# so a project's test dependencies need no image of their own.
FROM python:3.11-slim
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir -c .ci/constraints.txt . \
 && useradd --create-home dtf \
 && mkdir -p /data \
 && chown dtf /data
# Services run as dtf; compose.yaml's workers as root, so they can run each task as its own uid.
USER dtf
WORKDIR /home/dtf
CMD ["dtf", "--help"]
